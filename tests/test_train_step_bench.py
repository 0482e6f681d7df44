"""The end-to-end training-step benchmark (benchmarks/train_step.py) on its tiny CPU preset: a row per
(provider, N) with the harness's machine columns, upserted; out-of-memory cases and the longer N they
skip; other failures; the time budget."""
import csv

import pytest
import torch

from benchmarks import train_step
from benchmarks.providers import Unsupported

PROVIDERS = ("peft-sdpa", "causalattn", "peft-eager+cat")


def _run(tmp_path, *args):
    return train_step.main(["--preset", "cpu", "--device", "cpu", "--out", str(tmp_path), "--iterations", "2", *args])


def _read(tmp_path):
    with open(tmp_path / train_step.CSV_NAME, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


def _statuses(rows):
    return {(r["provider"], int(r["seq_len"])): r["status"] for r in rows}


def test_cpu_preset_writes_a_row_per_provider_and_length(tmp_path, capsys):
    assert _run(tmp_path, "--seq-lens", "256", "512", "--batch", "2") == 0
    header, rows = _read(tmp_path)
    assert header == train_step.FIELDS
    assert _statuses(rows) == {(p, n): "ok" for p in PROVIDERS for n in (256, 512)}
    preset = train_step.PRESETS["cpu"]
    # M prompt tokens on each of the top L layers, plus a gate per query head (causalattn) or one per layer (PEFT)
    prompts = preset.adapter_layers * preset.adapter_len * preset.hidden
    expected_params = {"causalattn": prompts + preset.adapter_layers * preset.heads,
                       "peft-sdpa": prompts + preset.adapter_layers, "peft-eager+cat": prompts + preset.adapter_layers}
    for row in rows:
        for column in ("date", "device", "torch", "transformers", "peft", "git_commit"):
            assert row[column], (column, row)
        assert (row["device_type"], row["preset"], row["dtype"], row["batch"], row["checkpointing"]) == \
            ("cpu", "cpu", "float32", "2", "0")
        assert int(row["layers"]) == preset.layers and int(row["adapter_len"]) == preset.adapter_len
        assert int(row["trainable_params"]) == expected_params[row["provider"]], row
        median = float(row["median_ms"])
        assert 0 < float(row["min_ms"]) <= median <= float(row["max_ms"]) and row["iterations"] == "2", row
        assert float(row["tokens_per_s"]) == pytest.approx(2 * int(row["seq_len"]) / (median * 1e-3), rel=1e-4)
        if row["peak_mb"]:  # blank only where Linux's /proc is missing
            assert float(row["peak_mb"]) > 0
    assert next(r for r in rows if r["provider"] == "causalattn")["note"] == "backend=reference"
    printed = capsys.readouterr().out
    baseline_line = next(line for line in printed.splitlines() if line.strip().startswith("256  (iii) peft-sdpa"))
    assert baseline_line.split()[-2:] == ["1.00", "1.00"]  # the ratios' own baseline
    assert "longest N that fits: (iii) peft-sdpa 512; (i) causalattn 512; (ii) peft-eager+cat 512" in printed

    # A second run replaces its (provider, N) rows and keeps the others.
    assert _run(tmp_path, "--seq-lens", "512", "--batch", "2", "--providers", "causalattn") == 0
    _, again = _read(tmp_path)
    assert len(again) == len(rows)
    assert [r for r in again if r["provider"] != "causalattn" or r["seq_len"] != "512"] == \
        [r for r in rows if r["provider"] != "causalattn" or r["seq_len"] != "512"]


def test_out_of_memory_marks_the_case_and_skips_longer_sequences(tmp_path, monkeypatch, capsys):
    make_tokens = train_step.random_tokens

    def tokens(batch, seq_len, vocab, device):
        if seq_len >= 512:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return make_tokens(batch, seq_len, vocab, device)

    monkeypatch.setattr(train_step, "random_tokens", tokens)
    assert _run(tmp_path, "--seq-lens", "256", "512", "1024", "--providers", "peft-sdpa", "causalattn") == 0
    _, rows = _read(tmp_path)
    assert _statuses(rows) == {(p, n): s for p in ("peft-sdpa", "causalattn")
                               for n, s in ((256, "ok"), (512, "oom"), (1024, "oom (skipped)"))}
    assert not any(r["median_ms"] for r in rows if r["status"] != "ok")
    assert "(i) causalattn 256 (out of memory from N=512)" in capsys.readouterr().out


def test_other_failures_are_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    make_tokens = train_step.random_tokens

    def tokens(batch, seq_len, vocab, device):
        if seq_len == 512:
            raise RuntimeError("something else broke\nsecond line")
        return make_tokens(batch, seq_len, vocab, device)

    def without_peft(*args):
        raise Unsupported("no peft here")

    monkeypatch.setattr(train_step, "random_tokens", tokens)
    monkeypatch.setattr(train_step, "_peft_model", without_peft)
    assert _run(tmp_path, "--seq-lens", "256", "512", "1024") == 0
    _, rows = _read(tmp_path)
    statuses = _statuses(rows)
    assert [statuses[("causalattn", n)] for n in (256, 512, 1024)] == \
        ["ok", "error: RuntimeError: something else broke", "ok"]
    assert {statuses[(p, n)] for p in ("peft-sdpa", "peft-eager+cat") for n in (256, 512, 1024)} == {"unsupported"}
    assert {r["note"] for r in rows if r["status"] == "unsupported"} == {"no peft here"}


def test_time_budget_cuts_cases_without_writing_them(tmp_path, capsys):
    assert _run(tmp_path, "--seq-lens", "256", "--time-budget-s", "0") == 0
    assert not (tmp_path / train_step.CSV_NAME).exists()
    assert "3 cases not run (not written)" in capsys.readouterr().out
