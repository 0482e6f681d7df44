"""`causalattn train` on a very small LLaMA (CPU, reference backend): the tiny-base cache, an end-to-end
CLI run, bit-identical resume, two gloo processes against one process with gradient accumulation,
and the errors bad options give.

The model here is `causalattn.lab.training.tiny`'s recipe at a much smaller size with two pre-training
steps: enough to exercise every path in seconds, not to learn the task.
"""
import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from causalattn.lab.cli import main
from causalattn.data import write_jsonl
from causalattn.lab.tasks import generate
from causalattn.lab.training import checkpoint, tiny
from causalattn.lab.training.batching import micro_batches
from causalattn.lab.training.command import train
from causalattn.lab.training.config import ConfigError, RunSpec, TrainConfig, add_arguments, config_from_args

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")

SMALL = tiny.TinyBaseSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=2, heads=2, kv_heads=1,
                              examples=32, batch_size=16, max_rounds=1)
# Small enough for seconds per run; every path on: CAT, XG, two epochs, two micro-batches per step.
FAST = ["--train-examples", "32", "--eval-examples", "12", "--batch-size", "4", "--eval-batch-size", "8",
        "--adapter-len", "4", "--epochs", "2", "--lr", "0.05", "--warmup-steps", "1", "--backend", "reference",
        "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A cached small tiny-base checkpoint directory (built once for this module)."""
    root = tmp_path_factory.mktemp("cache")
    return tiny.ensure_tiny_base(SMALL, root, show_progress=False, log=lambda message: None)


def adapter_weights(directory):
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def report_of(directory):
    return json.loads((Path(directory) / "report.json").read_text())


# ------------------------------------------------------------------------------ the tiny base
def test_tiny_base_is_built_once_and_reused(small_model, monkeypatch):
    assert (small_model / "config.json").is_file() and (small_model / "tokenizer.json").is_file()
    assert tiny.read_record(small_model)["settings"]["hidden_size"] == 32
    assert not [p for p in small_model.parent.iterdir() if p.name.endswith(".tmp")]

    def fail(*args, **kwargs):
        raise AssertionError("the cached base was built again")

    monkeypatch.setattr(tiny, "build_tiny_base", fail)
    assert tiny.ensure_tiny_base(SMALL, small_model.parent, log=lambda message: None) == small_model
    other = tiny.TinyBaseSettings(**{**SMALL.__dict__, "seed": 7})
    assert other.key() != SMALL.key()


# ------------------------------------------------------------------------------ end to end
def test_cli_runs_to_report_checkpoints_and_adapters(small_model, tmp_path, capsys):
    out = tmp_path / "job"
    code = main(["train", "--model", str(small_model), "--runs", "ce,ce+cat+xg", "--grad-accum", "2",
                 "--output-dir", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert all(f"{split} acc" in printed for split in ("iid", "flipped", "independent")) and "ce+cat+xg" in printed
    report = report_of(out)
    assert [run["name"] for run in report["runs"]] == ["ce", "ce+cat+xg"]
    for run in report["runs"]:
        expected = {(epoch, split) for epoch in range(3) for split in ("iid", "flipped", "independent")}
        assert {(row["epoch"], row["split"]) for row in run["accuracy"]} == expected
        assert len(run["history"]) == 2 * 32 // 8  # two epochs of 32 examples, 8 per optimizer step
        assert all(set(row) >= {"run", "step", "loss", "ce", "cat", "xg"} for row in run["history"])
        run_dir = out / run["name"].replace("+", "-")
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-001", "epoch-002", "latest"]
        final = adapter_weights(run_dir / "adapter")
        assert all(torch.equal(final[k], v) for k, v in adapter_weights(run_dir / "checkpoints" / "epoch-002").items())
        assert any(float(v.abs().max()) > 0 for k, v in final.items() if k.endswith("gate"))  # the gates moved
    ce, both = report["runs"]
    assert all(row["cat_weight"] == 0 for row in ce["history"])
    assert both["history"][0]["loss"] != both["history"][0]["ce"]  # CAT and XG are in the loss


def test_seeds_and_the_random_cause_control_give_mean_and_standard_error(small_model, tmp_path, capsys):
    out = tmp_path / "job"
    code = main(["train", "--model", str(small_model), "--runs", "ce+cat,ce+cat-random", "--seeds", "2",
                 "--output-dir", str(out), *FAST, "--epochs", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean ± standard error over 2 seeds" in printed and "ce+cat-random" in printed and "±" in printed
    report = report_of(out)
    assert [(run["name"], run["seed"]) for run in report["runs"]] == [
        ("ce+cat", 0), ("ce+cat-random", 0), ("ce+cat", 1), ("ce+cat-random", 1)]
    assert (out / "seed-1" / "ce-cat-random" / "adapter").is_dir()
    summary = report["summary"]["ce+cat"]
    values = [run["final_accuracy"]["flipped"] for run in report["runs"] if run["name"] == "ce+cat"]
    assert summary["seeds"] == [0, 1] and summary["acc_flipped"]["values"] == values
    assert summary["acc_flipped"]["mean"] == pytest.approx(sum(values) / 2)
    assert summary["acc_flipped"]["se"] == pytest.approx(abs(values[0] - values[1]) / 2)
    # with every gate 0 each run of a seed starts from the base model's answers, measured once
    before = [[(r["split"], r["accuracy"]) for r in run["accuracy"] if r["epoch"] == 0] for run in report["runs"]]
    assert before[0] == before[1] and len(before[0]) == 3
    # the majority-answer row is over every seed's test sets, not the last seed's
    majority = report["data"]["majority_accuracy"]["flipped"]
    per_seed = [run["majority_accuracy"]["flipped"] for run in report["runs"][::2]]
    assert majority["values"] == per_seed and majority["mean"] == pytest.approx(sum(per_seed) / 2)
    # the control supervises other tokens than the causes, so its CAT statistics differ
    real, control = report["runs"][0]["history"][0], report["runs"][1]["history"][0]
    assert real["cause_attn"] != control["cause_attn"]


def test_train_qk_trains_and_checkpoints_the_query_key_weights(small_model, tmp_path):
    args = ["train", "--model", str(small_model), "--runs", "ce+cat", "--train-qk", *FAST]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0
    run = report_of(tmp_path / "straight")["runs"][0]
    weights = load_file(str(Path(run["adapter_dir"]) / checkpoint.BASE_WEIGHTS_NAME))
    assert weights and all(".q_proj." in k or ".k_proj." in k for k in weights)
    base = load_file(str(small_model / "model.safetensors"))
    assert any(not torch.equal(weights[k], base[k]) for k in weights)  # they moved
    assert run["parameters"]["trainable"] > run["parameters"]["adapter"]


def test_the_embedded_shortcut_job_keeps_the_cat_loss_at_full_weight():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    embedded = config_from_args(parser.parse_args([]))
    assert (embedded.cat_kind, embedded.cat_decay, embedded.train_qk, embedded.seeds) == ("mass", 0.0, True, 3)
    assert (embedded.cue_agreement, embedded.cat_rows, embedded.cat_heads) == (0.97, "question", "mean")
    assert (embedded.cat_layers, embedded.cat_weight) == ((0,), 3.0)
    assert [run.name for run in embedded.runs] == ["ce", "ce+cat", "ce+cat-random"]
    cancer = config_from_args(parser.parse_args(["--task", "cancer-risk"]))
    assert (cancer.cat_kind, cancer.cat_decay, cancer.cat_rows, cancer.cat_layers, cancer.cat_weight) == (
        "div", 1.0, "answer", (), 1.0)  # CAT's own
    assert [run.name for run in cancer.runs] == ["ce", "ce+cat", "ce+cat+xg", "ce+cat-random"]
    dialects = config_from_args(parser.parse_args(["--task", "dialects"]))
    assert dialects.cue_agreement == 0.93
    chosen = config_from_args(parser.parse_args(["--cat-kind", "div", "--cat-decay", "2", "--cue-agreement", "0.9",
                                                 "--cat-heads", "each"]))
    assert (chosen.cat_kind, chosen.cat_decay, chosen.cue_agreement, chosen.cat_heads) == ("div", 2.0, 0.9, "each")
    # a job with CAT's own head mean keeps the options (and so the checkpoints) it had before the flag
    assert "cat_heads" not in embedded.trajectory_options() and chosen.trajectory_options()["cat_heads"] == "each"
    layers = config_from_args(parser.parse_args(["--cat-layers", "2,1", "--cat-weight", "2"]))
    assert (layers.cat_layers, layers.cat_weight, layers.trajectory_options()["cat_layers"]) == ((1, 2), 2.0, [1, 2])
    assert config_from_args(parser.parse_args(["--cat-layers", "all"])).cat_layers == ()
    with pytest.raises(SystemExit):
        parser.parse_args(["--cat-layers", "first"])
    for bad in ("0,0", "-1"):
        with pytest.raises(ConfigError, match="--cat-layers: expected distinct non-negative layer indices"):
            config_from_args(parser.parse_args(["--cat-layers", bad]))


def test_the_shortcut_layout_flags_reach_the_data_and_are_refused_elsewhere():
    from causalattn.lab.training.batching import load_data

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--cat-rows", "question", "--cue-position", "last",
                                                 "--train-examples", "8", "--eval-examples", "4"]))
    data = load_data(config, log=lambda message: None)
    assert all(len(example.important) == 2 for example in data.train)
    assert all(example.input.split(" . ")[0].split(" ")[-1].startswith("Fingers=") for example in data.train)
    for flags in (["--task", "dialects", "--cat-rows", "question"], ["--task", "cancer-risk", "--cue-position", "last"]):
        with pytest.raises(ConfigError, match=f"{flags[2]}: shapes the generated shortcut task"):
            config_from_args(parser.parse_args(flags))


def test_cat_layers_beyond_the_model_are_refused_and_chosen_layers_train(small_model, tmp_path):
    options = dict(model=str(small_model), train_examples=8, eval_examples=4, epochs=1, batch_size=4, adapter_len=4,
                   backend="reference", quiet=True, runs=(RunSpec.parse("ce+cat"),))
    with pytest.raises(ConfigError, match=r"--cat-layers: the model has 2 layers \(indices 0-1\), got 2"):
        train(TrainConfig(cat_layers=(2,), output_dir=str(tmp_path / "bad"), **options).validate())
    report = train(TrainConfig(cat_layers=(1,), output_dir=str(tmp_path / "job"), **options).validate())
    assert report["runs"][0]["history"][-1]["cat"] != 0  # the div loss is negative


def test_cancer_risk_task_keeps_its_iid_and_ood_tests(small_model, tmp_path):
    config = TrainConfig(model=str(small_model), task="cancer-risk", train_examples=16, eval_examples=6, epochs=1,
                         batch_size=4, adapter_len=4, backend="reference", output_dir=str(tmp_path / "job"),
                         quiet=True).validate()
    report = train(config)
    assert set(report["runs"][0]["final_accuracy"]) == {"iid", "ood"}
    assert "cancer-risk" in report["data"]["source"]


def test_routed_run_logs_routes_mi_vq_and_invariant_accuracy(small_model, tmp_path, capsys):
    out = tmp_path / "job"
    # the routed run first: it measures the job's accuracy at gates 0, which the plain run then shares
    code = main(["train", "--model", str(small_model), "--task", "dialects", "--runs", "ce+routed,ce",
                 "--domains", "2", "--domain-len", "3", "--route", "oracle", "--output-dir", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ce+routed invariant" in printed and "route NMI train 1.00, iid 1.00" in printed
    report = report_of(out)
    routed, plain = report["runs"]
    assert "route_fractions" not in plain["history"][-1]
    assert not any(row["split"].endswith("-invariant") for row in plain["accuracy"])
    epochs = [row for row in routed["history"] if "route_fractions" in row]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all(row["route_nmi"] == pytest.approx(1.0) for row in epochs)  # the oracle route is the dialect
    assert sum(epochs[-1]["route_fractions"]) == pytest.approx(1.0)
    assert set(routed["final_accuracy"]) == {f"{s}{suffix}" for s in ("iid", "flipped", "recombined")
                                             for suffix in ("", "-invariant")}
    assert routed["history"][0]["vq"] == 0.0 and "mi" in routed["history"][0]  # oracle: no VQ loss
    assert set(report["summary"]["ce+routed"]) >= {"mi", "vq", "route_nmi", "acc_iid-invariant", "route_nmi_iid"}
    tests = [row for row in routed["accuracy"] if not row["split"].endswith("-invariant") and row["epoch"] > 0]
    assert all(row["route_nmi"] == pytest.approx(1.0) for row in tests)  # each test set's dialects, by the oracle
    weights = adapter_weights(out / "ce-routed" / "adapter")
    assert any(k.endswith(".bank") for k in weights) and "router.codebook" in weights
    assert not any(k.endswith(".bank") or k.startswith("router.") for k in adapter_weights(out / "ce" / "adapter"))
    assert report["config"]["domains"] == 2 and report["config"]["route"] == "oracle"
    assert report["plots"]["notes"] == [] and "attention_ce+routed" in report["plots"]["files"]  # oracle ids reach the plot
    assert "domains" not in TrainConfig().trajectory_options()  # unrouted jobs resume as before


def test_invariant_ce_adds_the_invariant_mechanisms_own_loss(small_model, tmp_path):
    """--invariant-ce W adds W * CE of the same batch with the domain prompts off (ICLM's CE(invariant))."""
    gaps = {}
    for weight in ("0", "1"):
        out = tmp_path / f"job-{weight}"
        assert main(["train", "--model", str(small_model), "--task", "dialects", "--runs", "ce+routed",
                     "--domain-len", "3", "--route", "oracle", "--invariant-ce", weight, "--output-dir", str(out),
                     *FAST]) == 0
        first = report_of(out)["runs"][0]["history"][0]
        gaps[weight] = first["loss"] - first["ce"] - 0.01 * first["mi"]  # oracle: no VQ loss
    assert abs(gaps["0"]) < 1e-6
    assert gaps["1"] > 0.1  # at zero-init the invariant mechanism alone is the base: CE of the order of ln 2


def test_jsonl_data_with_eval_file(small_model, tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train_file, generate(16, seed=1))
    write_jsonl(eval_file, generate(6, seed=2, ood=True))
    config = TrainConfig(model=str(small_model), data=str(train_file), eval_data=str(eval_file), epochs=1,
                         batch_size=4, adapter_len=4, backend="reference", output_dir=str(tmp_path / "job"),
                         quiet=True).validate()
    report = train(config)
    assert report["data"]["candidates"] == ["High Risk", "Low Risk"]
    assert [(row["epoch"], row["split"]) for row in report["runs"][0]["accuracy"]] == [(0, "eval"), (1, "eval")]


# ------------------------------------------------------------------------------ resume
def crash_then_resume(monkeypatch, args: list, before_crash=lambda run_dir: None) -> None:
    """Run `causalattn train args`, killed right after its first epoch's checkpoint (after
    `before_crash(run_dir)`, e.g. leftovers of a killed second write), then the same with --resume."""
    real_save = checkpoint.save_checkpoint

    def save_then_crash(run_dir, *a, **kw):
        real_save(run_dir, *a, **kw)
        before_crash(run_dir)
        raise KeyboardInterrupt("simulated crash after the first epoch's checkpoint")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main(args + ["--resume"]) == 0


@pytest.mark.parametrize("options", [
    ["--runs", "ce+cat+xg", "--train-qk"],  # the trained q/k weights must come back too, not only the adapters
    ["--task", "dialects", "--runs", "ce+routed", "--route", "vq"],  # the bank, the router and its batch-norm
], ids=["train-qk", "routed"])
def test_resume_continues_the_identical_trajectory(options, small_model, tmp_path, monkeypatch):
    args = ["train", "--model", str(small_model), *options, *FAST]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0

    crash_then_resume(monkeypatch, args + ["--output-dir", str(tmp_path / "resumed")],
                      lambda run_dir: plant_staging_leftovers(checkpoint.checkpoint_root(run_dir), "epoch-002"))

    straight, resumed = report_of(tmp_path / "straight")["runs"][0], report_of(tmp_path / "resumed")["runs"][0]
    assert not [p for p in (tmp_path / "resumed").rglob("*.tmp")]  # the leftovers went at the restart
    assert resumed["resumed_at_epoch"] == 1
    assert resumed["history"] == straight["history"]
    assert resumed["accuracy"] == straight["accuracy"]
    a, b = adapter_weights(straight["adapter_dir"]), adapter_weights(resumed["adapter_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def plant_staging_leftovers(root: Path, name: str) -> list[Path]:
    """What a write killed mid-way leaves: a partial staging folder and a staged `latest`."""
    staging = root / f".{name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    latest = root / f".{checkpoint.LATEST_NAME}.{uuid.uuid4().hex}.tmp"
    latest.write_text(name + "\n")
    return [staging, latest]


def test_staging_leftovers_are_removed_and_nothing_else(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    complete = root / "epoch-001"
    complete.mkdir(parents=True)
    (complete / checkpoint.PROGRESS_NAME).write_text("{}")
    (root / checkpoint.LATEST_NAME).write_text("epoch-001\n")
    kept = [complete, root / checkpoint.LATEST_NAME, root / "notes.tmp", root / ".epoch-003.tmp"]
    kept[2].write_text("not a staging name")
    kept[3].mkdir()
    leftovers = plant_staging_leftovers(root, "epoch-002")
    assert checkpoint.remove_staging_leftovers(tmp_path) == sorted(leftovers)
    assert sorted(root.iterdir()) == sorted(kept) and (complete / checkpoint.PROGRESS_NAME).is_file()
    assert checkpoint.remove_staging_leftovers(tmp_path) == []
    assert checkpoint.remove_staging_leftovers(tmp_path / "never-ran") == []


def test_resume_refuses_other_options_and_fresh_runs_refuse_old_dirs(small_model, tmp_path, capsys):
    args = ["train", "--model", str(small_model), "--runs", "ce", *FAST, "--epochs", "1", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "--output-dir" in error and "already holds checkpoints" in error and "--resume" in error
    assert main(args + ["--resume", "--lr", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "--resume" in error and "lr: checkpoint 0.05, now 0.01" in error


# ------------------------------------------------------------------------------ several processes
def test_micro_batches_of_k_processes_are_those_of_one_process_accumulating_k():
    order = list(range(48))
    one = TrainConfig(batch_size=4, grad_accum=3)
    many = TrainConfig(batch_size=4, grad_accum=1)
    for step in range(4):
        accumulated = micro_batches(order, step, one, rank=0, world_size=1)
        assert [micro_batches(order, step, many, rank=r, world_size=3)[0] for r in range(3)] == accumulated
        assert sorted(i for mb in accumulated for i in mb) == order[step * 12:(step + 1) * 12]


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_grad_accum(small_model, tmp_path, mode):
    common = ["train", "--model", str(small_model), "--runs", "ce+cat+xg", *FAST]
    assert main(common + ["--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "causalattn.lab.cli", *common, "--grad-accum", "1", "--output-dir", str(tmp_path / "two"), *mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = report_of(tmp_path / "one"), report_of(tmp_path / "two")
    assert two["environment"]["world_size"] == 2
    h1, h2 = one["runs"][0]["history"], two["runs"][0]["history"]
    assert len(h1) == len(h2) == 8
    for a, b in zip(h1, h2):
        for key in ("loss", "ce", "cat", "xg"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"])
    assert [r["accuracy"] for r in one["runs"][0]["accuracy"]] == [r["accuracy"] for r in two["runs"][0]["accuracy"]]
    w1, w2 = adapter_weights(one["runs"][0]["adapter_dir"]), adapter_weights(two["runs"][0]["adapter_dir"])
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_gloo_processes_that_fail_after_joining_exit_without_waiting(small_model, tmp_path):
    """A job that fails once the process group exists (here --cat-layers against the model) ends every
    process with the error at once: after an error no rank waits for the others before leaving."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "causalattn.lab.cli", "train", "--model", str(small_model), *FAST, "--cat-layers", "9",
               "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--cat-layers: the model has" in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("options, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1"], "--batch-size: the XG variance"),
    (["--runs", "cat"], "--runs"),
    (["--runs", "ce", "--no-cat"], "--runs"),
    (["--xg-tokens", "11"], "--xg-tokens"),
    (["--cat-alpha", "-1"], "--cat-alpha"),
    (["--resume"], "--resume: needs --output-dir"),
    (["--model", "no/such/dir"], "--model"),
    (["--data", "missing.jsonl"], "--data"),
    (["--eval-data", "x.jsonl"], "--eval-data"),
    (["--train-examples", "8", "--batch-size", "4", "--grad-accum", "4"], "--batch-size: one optimizer step takes 16"),
    (["--runs", "ce+routed", "--domains", "1"], "--domains"),
    (["--runs", "ce+routed", "--invariant-ce", "-1"], "--invariant-ce"),
    (["--runs", "ce+routed", "--route", "soft", "--domains", "6", "--domain-len", "10"], "--domain-len"),
    (["--runs", "ce+routed", "--route", "oracle", "--task", "cancer-risk"], "--route: oracle"),
])
def test_bad_options_name_the_flag(options, flag, small_model, tmp_path, capsys):
    base = ["train", "--output-dir", str(tmp_path / "job"), "--quiet"]
    if "--model" not in options:
        base += ["--model", str(small_model)]
    if "--resume" in options:
        base = base[:1] + base[3:]
    assert main(base + options) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_bad_jsonl_record_is_reported_with_its_line(small_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
    assert main(["train", "--model", str(small_model), "--data", str(bad), "--output-dir", str(tmp_path / "j")]) == 2
    assert f"--data: {bad}:2: missing field(s) ['target']" in capsys.readouterr().err
