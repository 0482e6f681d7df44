"""The benchmark harness (benchmarks/): the smoke preset end to end on CPU, the FLOP convention, the
CSV upsert, the tables, and the baselines computing what the fused op computes."""
import csv

import pytest
import torch

import causalattn
from benchmarks import harness
from benchmarks.providers import DOCUMENT_LEN, PROVIDERS, Shape, make_problem, spread_rows_mask

CUDA_ONLY = ("flex", "flex2pass+cat", "flex2pass+all", "flash-attn")
SDPA_BACKENDS_MISSING_ON_CPU = ("sdpa-efficient", "sdpa-cudnn")


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


def test_smoke_preset_writes_a_row_per_provider(tmp_path, capsys):
    assert harness.main(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--rep-ms", "1"]) == 0
    header, rows = _read(tmp_path / "smoke.csv")
    assert header == harness.FIELDS
    assert sorted(r["provider"] for r in rows) == sorted(PROVIDERS)
    for row in rows:
        name, status = row["provider"], row["status"]
        assert row["device"] and row["torch"] and row["git_commit"] and row["date"], row
        assert row["mode"] == "fwd+bwd" and row["dtype"] == "float32", row
        assert float(row["attn_gflop"]) == pytest.approx(harness.attention_flops(2, 4, 64, 32, "fwd+bwd") / 1e9, rel=1e-5)
        assert (float(row["adapter_gflop"]) > 0) == ("adapter" in row["features"]), row
        if name in CUDA_ONLY or name in SDPA_BACKENDS_MISSING_ON_CPU:
            assert status == "unsupported" and row["note"], row
            assert not row["median_ms"], row
            continue
        assert status == "ok", row
        assert 0 < float(row["q20_ms"]) <= float(row["median_ms"]) <= float(row["q80_ms"]), row
        assert float(row["tflops"]) > 0
        if row["peak_mb"]:  # blank only where Linux's /proc is missing; RSS-based, a few MB here
            float(row["peak_mb"])
    printed = capsys.readouterr().out
    assert "best SDPA: sdpa-" in printed and "causalattn+all" in printed


def test_flops_follow_flashattention_convention():
    dense_fwd = 4 * 2 * 8 * 1024**2 * 64
    assert harness.attention_flops(2, 8, 1024, 64, "fwd", causal=False) == dense_fwd
    assert harness.attention_flops(2, 8, 1024, 64, "fwd") == dense_fwd / 2
    assert harness.attention_flops(2, 8, 1024, 64, "bwd") == 2.5 * dense_fwd / 2
    assert harness.attention_flops(2, 8, 1024, 64, "fwd+bwd") == 3.5 * dense_fwd / 2
    assert harness.adapter_flops(2, 8, 1024, 10, 64, "fwd") == 4 * 2 * 8 * 1024 * 10 * 64
    assert harness.adapter_flops(2, 8, 1024, 10, 64, "fwd+bwd") == 3.5 * 4 * 2 * 8 * 1024 * 10 * 64


def _row(**changes):
    row = dict(device="cpu-a", provider="sdpa-flash", mode="fwd", batch=2, seq_len=128, heads_q=4, heads_kv=2,
               head_dim=64, adapter_len=10, xg_tokens=2, dtype="float32", status="ok", median_ms=1.0, q20_ms=0.9,
               q80_ms=1.1, tflops=1.0, peak_mb=10.0)
    row.update(changes)
    return row


def test_upsert_replaces_rows_with_the_same_device_provider_mode_and_shape(tmp_path):
    path = tmp_path / "sweep.csv"
    harness.upsert_rows(path, [_row(), _row(mode="bwd"), _row(seq_len=256, batch=1)])
    harness.upsert_rows(path, [_row(median_ms=2.0), _row(device="cpu-b")])
    header, rows = _read(path)
    assert header == harness.FIELDS
    assert len(rows) == 4
    keyed = {(r["device"], r["mode"], r["seq_len"]): r for r in rows}
    assert float(keyed[("cpu-a", "fwd", "128")]["median_ms"]) == 2.0
    assert float(keyed[("cpu-a", "bwd", "128")]["median_ms"]) == 1.0
    assert set(keyed) == {("cpu-a", "fwd", "128"), ("cpu-a", "bwd", "128"), ("cpu-a", "fwd", "256"), ("cpu-b", "fwd", "128")}


def test_tables_compare_with_the_fastest_sdpa_backend():
    rows = [_row(), _row(provider="sdpa-math", median_ms=4.0), _row(provider="causalattn", median_ms=0.5, peak_mb=5.0),
            _row(provider="eager+cat", status="oom", median_ms=None)]
    assert harness.best_sdpa(rows)["provider"] == "sdpa-flash"
    table = harness.format_table(rows)
    assert "best SDPA: sdpa-flash 1.000 ms" in table
    causalattn_line = next(line for line in table.splitlines() if line.startswith("causalattn"))
    assert "0.50" in causalattn_line.split()  # time and memory ratios
    assert "oom" in next(line for line in table.splitlines() if line.startswith("eager+cat"))
    compact = harness.format_compact(rows)
    assert "0.50x" in compact and "oom" in compact


# Baselines against the fused op with the same features: same output, same loss (CAT and XG included).
SAME_MATH = [("sdpa-flash", "causalattn"), ("sdpa-math", "causalattn"), ("sdpa+adapter-sdpa", "causalattn+adapter"),
             ("eager+cat", "causalattn+cat"), ("eager+all", "causalattn+all"),
             *((f"composed{suffix}", f"causalattn{suffix}") for suffix in ("", "+adapter", "+cat", "+xg", "+all"))]


@pytest.fixture(scope="module")
def problem():
    # One document of DOCUMENT_LEN tokens, so the cause mask has supervised rows.
    shape = Shape(batch=2, seq_len=DOCUMENT_LEN, heads_q=4, heads_kv=2, head_dim=32, adapter_len=6, xg_tokens=2,
                  dtype="float32")
    return make_problem(shape, torch.device("cpu"))


@pytest.mark.parametrize("baseline, fused", SAME_MATH)
def test_baselines_compute_what_the_fused_op_computes(problem, baseline, fused):
    out, loss = PROVIDERS[baseline].build(problem).forward()
    expected_out, expected_loss = PROVIDERS[fused].build(problem).forward()
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-4)
    if expected_loss is None:
        assert loss is None
    else:
        assert expected_loss.abs() > 0  # the supervision is not empty
        torch.testing.assert_close(loss, expected_loss, atol=2e-5, rtol=1e-4)


def test_peft_adapter_is_the_raw_scalar_gate_adapter(problem):
    out, _ = PROVIDERS["sdpa+adapter-peft"].build(problem).forward()
    adapter = causalattn.Adapter(problem.adapter_keys, problem.adapter_values, problem.gate_scalar, gate_mode="raw")
    expected = causalattn.attention(problem.q, problem.k, problem.v, adapter=adapter, backend="reference").out
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)



@pytest.mark.parametrize("fraction", [0.003, 0.1, 1.0])
def test_spread_rows_mask_has_the_asked_density(fraction):
    mask = spread_rows_mask(2, 512, fraction)
    dense = mask.to_dense()
    supervised = (dense.sum(-1) > 0).float().mean().item()
    assert abs(supervised - max(1, round(fraction * 512)) / 512) < 0.07  # rows below 32 carry no causes
    assert not dense.triu().any()  # causes lie strictly before their row
    assert torch.equal(dense[0], dense[1])


def test_paired_ratios_are_per_round_against_the_baseline(tmp_path, capsys):
    from benchmarks import paired

    assert paired.main(["--seq-lens", "64", "--rounds", "5", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path),
                        "--providers", "composed", "composed+all"]) == 0
    header, rows = _read(tmp_path / "paired-cpu.csv")
    assert header == paired.FIELDS
    by_provider = {row["provider"]: row for row in rows}
    assert set(by_provider) == {"sdpa-flash", "composed", "composed+all"}
    assert float(by_provider["sdpa-flash"]["ratio"]) == 1.0 and by_provider["composed"]["rounds"] == "5"
    assert float(by_provider["composed+all"]["ratio_q20"]) <= float(by_provider["composed+all"]["ratio_q80"])
