"""The real-model training-step benchmark (benchmarks/real_model_bench.py): its pure parts, without a
model: B N arithmetic, the rotated round order, the "oom (skipped)" rule, per-round ratios and their
median over rounds, the bar lines, the table, and how a worker's output becomes a result; then every
provider's step in-process on a tiny saved LLaMA (no pretrained model needed)."""
import signal

import pytest

from benchmarks import real_model_bench as bench
from benchmarks.harness import is_oom


def _row(provider, seq_len, round_index, status="ok", median_s=None, peak=None):
    return {"provider": provider, "seq_len": seq_len, "batch": bench.TOKENS_PER_STEP // seq_len,
            "round": round_index, "status": status, "median_s": median_s, "peak_rss_mb": peak}


def test_batch_keeps_the_tokens_per_step():
    assert [bench.batch_for(4096, n) for n in bench.SEQ_LENS] == [16, 4, 2, 1]
    assert bench.batch_for(128, 64) == 2
    for tokens, n in ((4096, 3000), (1024, 2048), (4096, 0)):
        with pytest.raises(ValueError, match="tokens-per-step"):
            bench.batch_for(tokens, n)


def test_rounds_rotate_the_order():
    providers = ["a", "b", "c"]
    orders = [bench.round_order(providers, r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # over len(providers) rounds every provider takes every slot once
    assert all(sorted(order[slot] for order in orders[:3]) == providers for slot in range(3))
    assert bench.round_order(bench.PROVIDERS, 0)[0] == bench.BASELINE


def test_out_of_memory_skips_that_length_and_longer_ones():
    first_oom = {bench.EAGER: 2048}
    assert bench.skip_status(first_oom, bench.EAGER, 1024) is None
    assert bench.skip_status(first_oom, bench.EAGER, 2048) == "oom (skipped)"  # the later rounds at that N
    assert bench.skip_status(first_oom, bench.EAGER, 4096) == "oom (skipped)"
    assert bench.skip_status(first_oom, bench.OURS, 4096) is None
    assert bench.is_out_of_memory("oom") and not bench.is_out_of_memory("oom (skipped)")


def test_ratios_within_the_round_then_the_median_over_rounds():
    rows = []
    # round 0 on a quiet machine, round 1 twice as slow for everyone: the ratios do not move
    for r, slow in ((0, 1.0), (1, 2.0), (2, 1.0)):
        this_round = [_row(bench.BASELINE, 2048, r, median_s=2.0 * slow, peak=1000.0),
                      _row(bench.OURS, 2048, r, median_s=(2.4 if r < 2 else 3.0) * slow, peak=1100.0 + r),
                      _row(bench.EAGER, 2048, r, median_s=8.0 * slow, peak=8000.0)]
        bench.round_ratios(this_round)
        rows.extend(this_round)
    assert rows[1]["time_vs_sdpa"] == pytest.approx(1.2) and rows[1]["time_vs_eager"] == pytest.approx(0.3)
    assert rows[0]["time_vs_sdpa"] == 1.0 and rows[2]["mem_vs_eager"] == 1.0
    summary = {s["provider"]: s for s in bench.summarize(rows)}
    ours = summary[bench.OURS]
    assert ours["rounds_ok"] == 3 and ours["status"] == "ok"
    assert ours["median_s"] == pytest.approx(3.0)          # the median of 2.4, 4.8, 3.0
    assert ours["time_vs_sdpa"] == pytest.approx(1.2)      # the median of 1.2, 1.2, 1.5
    assert ours["time_vs_eager"] == pytest.approx(0.3)
    assert ours["peak_mb"] == 1102.0                       # the largest over rounds
    assert list(summary) == [bench.BASELINE, bench.OURS, bench.EAGER]  # PROVIDERS' order


def test_failed_cases_have_no_ratio_and_keep_their_status():
    this_round = [_row(bench.BASELINE, 4096, 0, median_s=4.0, peak=1500.0),
                  _row(bench.OURS, 4096, 0, median_s=5.0, peak=1600.0),
                  _row(bench.EAGER, 4096, 0, status="oom", peak=18000.0)]
    bench.round_ratios(this_round)
    assert this_round[1]["time_vs_sdpa"] == pytest.approx(1.25) and this_round[1]["time_vs_eager"] is None
    assert all(this_round[2][f] is None for f in bench.RATIO_FIELDS)
    summary = bench.summarize([*this_round, _row(bench.EAGER, 4096, 1, status="oom (skipped)")])
    eager = next(s for s in summary if s["provider"] == bench.EAGER)
    assert (eager["status"], eager["rounds_ok"], eager["median_s"], eager["peak_mb"]) == ("oom", 0, None, None)
    lines = bench.bar_lines(summary)
    assert "not measured" in lines[0]
    assert lines[1] == f"bar N=4096: {bench.EAGER} oom where {bench.OURS} runs (met)"
    table = bench.format_markdown(summary, "test")
    assert f"| 4096 | 1 | {bench.EAGER} | oom |  |  |" in table and f"- {lines[1]}" in table


def test_the_bar_from_measured_cases():
    rows = []
    for seq_len, eager_s, eager_mb in ((2048, 10.0, 9000.0), (4096, 30.0, 5000.0)):
        this_round = [_row(bench.BASELINE, seq_len, 0, median_s=2.0, peak=1000.0),
                      _row(bench.OURS, seq_len, 0, median_s=4.0, peak=1250.0),
                      _row(bench.EAGER, seq_len, 0, median_s=eager_s, peak=eager_mb)]
        bench.round_ratios(this_round)
        rows.extend(this_round)
    assert bench.bar_lines(bench.summarize(rows)) == [
        f"bar N=2048: {bench.OURS} time x {bench.EAGER} = 0.40 (<= 0.45: met)",
        f"bar N=4096: {bench.EAGER} peak x {bench.OURS} = 4.00 (>= 4.0: met)"]


def test_worker_output_becomes_a_result():
    line = bench.RESULT_PREFIX + '{"status": "ok", "median_s": 1.5, "peak_rss_mb": 1200.0}'
    assert bench.parse_worker_output(f"some library line\n{line}\n", "", 0)["median_s"] == 1.5
    killed = bench.parse_worker_output("", "", -signal.SIGKILL)
    assert killed["status"] == "oom" and "SIGKILL" in killed["note"]
    crashed = bench.parse_worker_output("", "Traceback ...\nImportError: no module\n\n", 1)
    assert crashed["status"] == "error: worker exit 1: ImportError: no module"
    assert bench.parse_worker_output("", "", -signal.SIGSEGV)["status"].startswith("error: worker signal 11")


def test_allocation_failures_under_a_cap_count_as_out_of_memory():
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("unable to mmap 538090408 bytes from file <x>: Cannot allocate memory (12)"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_every_provider_steps_a_tiny_saved_llama(tmp_path, single_thread):
    """The worker's measurement in-process on a 2-layer random LLaMA saved as a folder (the real model's
    path through from_pretrained, adapters on every layer): a fraction of a second beyond importing
    transformers and PEFT."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    prompts = 2 * bench.ADAPTER_LEN * 64  # M prompt tokens of width d_model on each of the 2 layers
    gates = {bench.BASELINE: 2, bench.EAGER: 2}  # PEFT: a scalar gate per layer; causalattn: one per query head
    for provider in bench.PROVIDERS:
        result = bench.measure(bench.Case(provider, str(tmp_path), seq_len=256, batch=1, steps=1, warmup=0))
        assert result["status"] == "ok" and result["median_s"] > 0, (provider, result)
        assert result["trainable_params"] == prompts + gates.get(provider, 2 * 4), (provider, result)
