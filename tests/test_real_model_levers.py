"""The levers and fixes a real pretrained model needs, on the small tiny base: PEFT LoRA beside the prompts
(trained, checkpointed, resumed bit for bit), seeded subsets of JSONL files, the random-cause control on
CAT-format files, the comparison `--model` runs by default, and the Trainer collator's pad token."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import causalattn.hf as cah
from causalattn.data.jsonl import read_jsonl
from causalattn.lab.cli import main
from causalattn.lab.tasks.controls import text_fields
from causalattn.lab.training import checkpoint, lora, progress
from causalattn.lab.training.config import ConfigError, TrainConfig
from causalattn.lab.training.loop import add_job_adapters, load_model, make_optimizer

from test_cat_format import STG_PROMPT, write
from test_train import FAST, crash_then_resume, report_of, small_model  # noqa: F401 - small_model is a fixture

pytestmark = pytest.mark.filterwarnings("ignore:xg_variance")
# FAST without its STG sizes: the JSONL files below are used whole unless a test cuts them
JSONL_FAST = [option for option in FAST if option not in ("--train-examples", "32", "--eval-examples", "12")]


def stg_records(count: int, seed: int = 0) -> list[dict]:
    """Records in CAT's STG shape: eight "Name: value" fields, three of them the annotated causes."""
    rng = torch.Generator().manual_seed(seed)
    names = ["Certain gene", "Room size", "Smoking", "Weight", "Exercise", "Hormones", "Yellow fingers", "Clothing"]
    records = []
    for _ in range(count):
        values = {name: int(v) for name, v in zip(names, torch.randint(0, 10, (len(names),), generator=rng))}
        target = "High Risk" if values["Smoking"] + values["Weight"] > values["Exercise"] + 8 else "Low Risk"
        fields = ", ".join(f"{k}: {v}" for k, v in values.items())
        causes = [f"{k}: {values[k]}" for k in ("Smoking", "Weight", "Exercise")]
        records.append({"input": STG_PROMPT + fields + " Answer: ", "target": target, "important": [{target: causes}]})
    return records


def jsonl_job(tmp_path, train_count=24, test_count=10) -> list[str]:
    train = write(tmp_path / "train.jsonl", stg_records(train_count))
    test = write(tmp_path / "test.jsonl", stg_records(test_count, seed=1))
    return ["--data", str(train), "--eval-data", f"iid={test}"]


def test_lora_goes_on_the_chosen_projections_of_adapted_layers_beside_trainable_prompts(small_model):
    config = TrainConfig(model=str(small_model), adapter_len=4, adapter_layers=1, lora_rank=2, lora_targets="q,v")
    model = load_model(small_model, config, torch.device("cpu"))
    add_job_adapters(model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    top = max(cah.adapted_layers(model))
    assert {n for n in trainable if ".lora_" in n} == {
        f"model.layers.{top}.self_attn.{proj}.lora_{ab}.default.weight" for proj in ("q_proj", "v_proj") for ab in "AB"}
    assert any("prompt" in n for n in trainable) and any("gate" in n for n in trainable)  # PEFT froze nothing of ours
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    groups = make_optimizer(model, config, total_steps=4)[0].param_groups
    assert groups[-1]["initial_lr"] == lora.DEFAULT_LR and len(groups[-1]["params"]) == 4


@pytest.mark.parametrize("options, message", [
    (["--lora-rank", "2", "--train-qk"], "--lora-rank: LoRA on q/k and --train-qk"),
    (["--lora-targets", "q,x"], "--lora-targets: 'q,x'"),
    (["--lora-rank", "-1"], "--lora-rank: expected 0"),
    (["--lora-lr", "0"], "--lora-lr: expected a positive number"),
    (["--eval-examples", "11"], "--eval-examples: 11 records asked for"),
])
def test_bad_lever_options_fail_before_any_work(small_model, tmp_path, capsys, options, message):
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), *jsonl_job(tmp_path), *options, *JSONL_FAST,
                 "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_lora_run_trains_and_resumes_the_identical_trajectory(small_model, tmp_path, monkeypatch):
    args = ["train", "--model", str(small_model), *jsonl_job(tmp_path), "--runs", "ce+cat", "--lora-rank", "2",
            "--lora-lr", "0.01", *JSONL_FAST]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0

    crash_then_resume(monkeypatch, args + ["--output-dir", str(tmp_path / "resumed")])

    straight, resumed = report_of(tmp_path / "straight")["runs"][0], report_of(tmp_path / "resumed")["runs"][0]
    assert resumed["resumed_at_epoch"] == 1 and resumed["history"] == straight["history"]
    a = load_file(f"{straight['adapter_dir']}/{checkpoint.BASE_WEIGHTS_NAME}")
    b = load_file(f"{resumed['adapter_dir']}/{checkpoint.BASE_WEIGHTS_NAME}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k.split(".")[-4] for k in a} == {"q_proj", "k_proj"}  # the default targets, LoRA only
    assert any(".lora_B." in k and a[k].abs().max() > 0 for k in a)  # B starts at 0: it trained


def test_jsonl_subsets_are_seeded_and_the_same_for_every_seed_of_a_job(small_model, tmp_path):
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), *jsonl_job(tmp_path), "--runs", "ce", "--seeds", "2",
                 "--train-examples", "16", "--eval-examples", "6", *JSONL_FAST, "--epochs", "1",
                 "--output-dir", str(out)]) == 0
    report = report_of(out)
    assert report["data"]["eval"] == {"iid": 6}
    assert {row["seed"] for run in report["runs"] for row in run["accuracy"]} == {0, 1}
    from causalattn.lab.training.batching import read_data_files
    config = TrainConfig(model=str(small_model), data=str(tmp_path / "train.jsonl"), train_examples=16)
    first, again = read_data_files(config).train, read_data_files(config).train
    assert first.examples == again.examples and len(first.examples) == 16
    other = read_data_files(TrainConfig(model=str(small_model), data=config.data, train_examples=16, seed=5)).train
    assert other.examples != first.examples and len(set(first.lines)) == 16


def test_random_cause_control_runs_on_cat_format_files(small_model, tmp_path):
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), *jsonl_job(tmp_path), "--runs", "ce+cat,ce+cat-random",
                 *JSONL_FAST, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert [run["name"] for run in report_of(out)["runs"]] == ["ce+cat", "ce+cat-random"]
    (example,) = read_jsonl(write(tmp_path / "one.jsonl", stg_records(1)))
    fields = text_fields(example)
    assert len(fields) == 8 and set(next(iter(example.important.values()))) <= set(fields)


def test_model_defaults_to_a_comparison(small_model, tmp_path):
    from causalattn.lab.training.config import add_arguments, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(small_model), *jsonl_job(tmp_path)])
    assert [run.name for run in config_from_args(args).runs] == ["ce", "ce+cat", "ce+cat+xg"]
    args = parser.parse_args(["--model", str(small_model), *jsonl_job(tmp_path), "--no-xg"])
    assert [run.name for run in config_from_args(args).runs] == ["ce+cat"]  # --cat/--xg: the one run they name
    with pytest.raises(ConfigError, match="--lora-rank"):
        TrainConfig(lora_rank=2, train_qk=True).validate()


def test_trainer_collator_pads_with_eos_or_refuses_at_construction(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token, tokenizer.eos_token = None, "<s>"
    collator = cah.CausalCollator(tokenizer)
    assert tokenizer.pad_token == "<s>"
    rows = [{"input": "Smoking: 8, Weight: 4 Answer: ", "target": "High Risk"},
            {"input": "Smoking: 1 Answer: ", "target": "Low Risk", "important": json.dumps([])}]
    batch = collator(rows)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the short row was padded
    bare = copy.deepcopy(tiny_tokenizer)
    bare.pad_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        cah.CausalCollator(bare)


def test_real_model_protocol_cuts_validation_from_train_only_and_tables_what_finished(tmp_path):
    from benchmarks import real_model

    stg = tmp_path / "stg"
    stg.mkdir()
    for name, count in (("train", 40), ("iid", 8), ("ood", 8)):
        write(stg / real_model.FILES[name], stg_records(count, seed=len(name)))
    train_lines = set((stg / real_model.FILES["train"]).read_text().splitlines())
    split = real_model.split_validation(stg / real_model.FILES["train"], tmp_path / "work" / "data", seed=0)
    val, rest = (set(split[k].read_text().splitlines()) for k in ("val", "train"))
    assert len(val) == 10 and not val & rest and val | rest == train_lines  # a quarter, disjoint, train3 only
    assert real_model.split_validation(stg / real_model.FILES["train"], tmp_path / "work" / "data", seed=1) == split
    command = real_model.job_command("M", "lora-qk-cat-lr", real_model.SELECT_RUNS, split["train"],
                                     {"val": split["val"]}, 0, tmp_path / "job", 1, ["--threads", "1"])
    assert command.count("--epochs") == 1 and command[command.index("--epochs") + 1] == "1" and "--resume" in command
    assert command[command.index("--lr") + 1] == "1e-3" and command[-2:] == ["--threads", "1"]  # recipe, then extra
    stg_files = {name: stg / file for name, file in real_model.FILES.items()}
    assert real_model.summarize(tmp_path / "work", tmp_path / "results", stg_files, split) is None
    text = (tmp_path / "results" / "selection.md").read_text()
    assert "| lora-qk: ce+cat | 0 (not finished)" in text and "no recipe is chosen until every one has" in text
    assert real_model.claim(tmp_path / "job") and real_model.claim(tmp_path / "job")  # ours, taken once
    (tmp_path / "job" / "job.lock").write_text("1")  # a live process of someone else
    assert not real_model.claim(tmp_path / "job")


def test_a_job_writing_to_a_pipe_prints_progress_lines_and_quiet_silences_them(small_model, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at every step: the tiny model's stages take ms
    loud = [option for option in JSONL_FAST if option != "--quiet"]
    assert main(["train", "--model", str(small_model), *jsonl_job(tmp_path), "--runs", "ce", *loud,
                 "--output-dir", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal, as a log file is not
    assert "[ce] epoch 1/2: 1/6 steps (17 %)" in err and "[ce] epoch 2/2: 6/6 steps (100 %)" in err
    assert "[ce] evaluating iid: 10/10 examples (100 %)" in err
    assert main(["train", "--model", str(small_model), *jsonl_job(tmp_path), "--runs", "ce", *JSONL_FAST,
                 "--output-dir", str(tmp_path / "quiet")]) == 0
    assert "steps" not in capsys.readouterr().err
