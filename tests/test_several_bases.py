"""A job over several independently built embedded bases: the defaults, the pooled table (mean and
standard error over base means), the build conditions that stand in for another machine, worker
processes that do not change the numbers, and progress lines when the output is not a terminal.

The bases here are `test_train`'s small recipe with two pre-training steps: enough to exercise every
path in seconds, not to learn the task.
"""
import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from causalattn.lab.cli import main
from causalattn.lab.training import tiny
from causalattn.lab.training.config import (DEFAULT_BASE_SEED, DEFAULT_BASES, ConfigError, add_arguments,
                                        config_from_args)
from causalattn.lab.training.loop import RunResult
from causalattn.lab.training.report import format_table, pooled, summarize_runs

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")

SMALL = tiny.TinyBaseSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=2, heads=2, kv_heads=1,
                              examples=32, batch_size=16, max_rounds=1)
FAST = ["--train-examples", "32", "--eval-examples", "12", "--batch-size", "4", "--eval-batch-size", "8",
        "--adapter-len", "4", "--epochs", "1", "--lr", "0.05", "--warmup-steps", "1", "--backend", "reference",
        "--threads", "1"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def report_of(directory):
    return json.loads((Path(directory) / "report.json").read_text())


@pytest.fixture
def small_bases(tmp_path, monkeypatch):
    """The embedded bases built from the small recipe into an empty cache."""
    monkeypatch.setenv("CAUSALATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "settings_for", lambda task, **build: dataclasses.replace(SMALL, task=task, **build))


# ------------------------------------------------------------------------------ defaults
def test_the_embedded_shortcut_job_builds_three_bases_on_two_workers():
    config = parse([])
    assert (config.bases, config.base_seed, config.workers, config.seeds) == (DEFAULT_BASES, DEFAULT_BASE_SEED, 2, 3)
    assert (config.base_threads, config.base_onednn) == (1, True)
    assert parse(["--task", "cancer-risk"]).bases == 1 and parse(["--task", "cancer-risk"]).workers == 1
    perturbed = parse(["--base-threads", "2", "--no-base-onednn", "--base-seed", "77", "--workers", "1"])
    assert (perturbed.base_threads, perturbed.base_onednn, perturbed.base_seed, perturbed.workers) == (2, False, 77, 1)


def test_several_bases_need_the_embedded_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--bases"):
        parse(["--model", str(tmp_path), "--bases", "2"])


# ------------------------------------------------------------------------------ pooling
def fake_run(name, base, seed, flipped):
    accuracy = [{"run": name, "seed": seed, "epoch": 1, "split": "flipped", "accuracy": flipped}]
    history = [{"epoch": 1, "step": 1, "ce": 0.1, "cat": 0.0, "xg": 0.0, "cause_attn": 0.2}]
    return RunResult(name, seed, history, accuracy, 1.0, 1.0, Path("."), base=base)


def test_the_error_is_over_base_means_not_over_every_run():
    values = [0.2, 0.4, 0.6, 0.8]  # two bases x two seeds
    mean, error, means = pooled(values, [1, 1, 2, 2])
    assert means == {1: pytest.approx(0.3), 2: pytest.approx(0.7)}
    assert mean == pytest.approx(0.5) and error == pytest.approx(0.2)  # sd 0.283 of the 2 base means / sqrt 2
    mean, error, means = pooled(values, [None] * 4)
    assert means == {} and error == pytest.approx(math.sqrt(sum((v - 0.5) ** 2 for v in values) / 3 / 4))


def test_summary_and_table_pool_over_bases_and_show_each_base():
    results = [fake_run("ce", base, seed, 0.1 * base + 0.01 * seed) for base in (1, 2, 3) for seed in (0, 1)]
    entry = summarize_runs(results)["ce"]
    assert entry["bases"] == [1, 1, 2, 2, 3, 3]
    assert entry["acc_flipped"]["base_means"] == {"1": pytest.approx(0.105), "2": pytest.approx(0.205),
                                                  "3": pytest.approx(0.305)}
    assert entry["acc_flipped"]["se"] == pytest.approx(0.1 / math.sqrt(3))
    data = argparse.Namespace(evals={"flipped": [None] * 10})
    table = format_table(results, data)
    assert "over 3 independently built bases, each base's value the mean of its 2 seeds (6 runs per row" in table
    assert "base 1" in table and "0.11" in table and "0.31" in table


# ------------------------------------------------------------------------------ the build
def test_build_conditions_are_part_of_the_base_and_restored(tmp_path):
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    lines = []
    other = dataclasses.replace(SMALL, threads=2, onednn=False, examples=64)
    path = tiny.ensure_tiny_base(other, tmp_path, show_progress=False, log=lines.append)
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)
    record = tiny.read_record(path)
    assert record["settings"]["threads"] == 2 and record["settings"]["onednn"] is False
    assert len(record["weights_sha256"]) == 16
    assert other.key() != SMALL.key()
    # not on a terminal: a line at every quarter of the pre-training (4 steps here)
    assert sum("step" in line for line in lines) == 4


def test_the_shortcut_base_recipe_and_the_build_switches():
    shortcut = tiny.settings_for("shortcut", seed=7, threads=2)
    assert (shortcut.lr, shortcut.examples, shortcut.seed, shortcut.threads) == (1e-3, 32000, 7, 2)
    other = tiny.settings_for("cancer-risk")
    assert (other.lr, other.examples) == (tiny.TinyBaseSettings.lr, tiny.TinyBaseSettings.examples)
    assert tiny.settings_for("shortcut", lr=3e-3).lr == 3e-3  # an explicit setting wins


# ------------------------------------------------------------------------------ the job
def test_a_job_on_two_bases_reports_each_and_pools_them(small_bases, tmp_path, capsys):
    out = tmp_path / "job"
    code = main(["train", "--bases", "2", "--base-seed", "5", "--seeds", "2", "--runs", "ce,ce+cat",
                 "--workers", "1", "--output-dir", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    # stdout is not a terminal here: the base builds and every run still say where the job is
    assert "tiny base (seed 6): round 1, step" in printed and "[base 6, seed 1] ce+cat: training" in printed
    assert "[base 5, seed 0] [ce] epoch 1/1" in printed
    assert "over 2 independently built bases" in printed and "accuracy per base" in printed
    report = report_of(out)
    assert [(r["base"], r["seed"], r["name"]) for r in report["runs"]][:3] == [(5, 0, "ce"), (5, 0, "ce+cat"),
                                                                               (5, 1, "ce")]
    assert [b["seed"] for b in report["model"]["bases"]] == [5, 6]
    assert report["model"]["bases"][0]["weights_sha256"] != report["model"]["bases"][1]["weights_sha256"]
    assert (out / "base-6" / "seed-1" / "ce-cat" / "adapter").is_dir()
    assert set(report["summary"]["ce"]["acc_iid"]["base_means"]) == {"5", "6"}


def test_workers_do_not_change_the_numbers(small_bases, tmp_path):
    common = ["train", "--bases", "2", "--seeds", "1", "--runs", "ce+cat", *FAST, "--quiet"]
    assert main(common + ["--workers", "1", "--output-dir", str(tmp_path / "one")]) == 0
    assert main(common + ["--workers", "2", "--output-dir", str(tmp_path / "two")]) == 0
    one, two = report_of(tmp_path / "one"), report_of(tmp_path / "two")
    assert [r["final_accuracy"] for r in one["runs"]] == [r["final_accuracy"] for r in two["runs"]]
    assert [r["history"][-1]["loss"] for r in one["runs"]] == [r["history"][-1]["loss"] for r in two["runs"]]
