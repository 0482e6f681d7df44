"""CAT's published JSONL files as they are: records written here by hand in the official shapes.

The shapes (CAT's STG, STG_H, MAWPS, SVAMP, ARC-E files): `important` is a list of `{effect: [causes]}`
objects; inputs end in "Answer: " and CAT trains on input + target with nothing between; STG_H targets
are JSON integers; MAWPS targets start with "Answer: "; test files have no `important`; many MAWPS /
SVAMP / ARC-E pairs name a cause after its effect or text that is absent, and are skipped and counted.
"""
import json

import pytest

from causalattn.lab.cli import main
from causalattn.data.annotations import check_annotations
from causalattn.data.batches import IGNORE_INDEX, collate, full_text
from causalattn.data.jsonl import read_file, read_jsonl
from causalattn.lab.training import tiny

from test_train import FAST, SMALL, report_of

STG_PROMPT = "Here is the statistical data for a person. Please predict the probability of cancer. "
STG_TRAIN = [
    {"input": STG_PROMPT + "Certain gene: 5, Smoking: 8, Weight: 4, Yellow fingers: 12, Exercise: 2 Answer: ",
     "target": "High Risk", "important": [{"High Risk": ["Exercise: 2", "Weight: 4", "Smoking: 8"]}]},
    {"input": STG_PROMPT + "Weight: 1, Exercise: 9, Smoking: 1, Room size: 3, Hormones: 4 Answer: ",
     "target": "Low Risk", "important": [{"Low Risk": ["Smoking: 1", "Weight: 1", "Exercise: 9"]}]},
]
STG_TEST = [{"input": STG_PROMPT + "Smoking: 9, Weight: 7, Exercise: 1, Room size: 2 Answer: ", "target": "High Risk"}]
STG_H = {"input": "Industrial Emissions: 47.9; Vehicle Emissions: 28.9; Coal Dependency: 41.9%. What is the "
                  "projected Air Quality Index (AQI) on a 0-100 scale? Answer: ",
         "target": 32, "important": [{"Answer: 32": ["47.9", "28.9", "41.9%"]}]}
MAWPS = {"input": "Ruth starts with 89 apples. She shares 5 with Peter. How many apples does Ruth end with?",
         "target": "Answer: 84.0", "type": "singleop", "idx": 604,
         "important": [{"89 apples": ["She shares"]},                # the cause comes after the effect
                       {"How many apples": ["Ruth end with", "She shares"]},  # one after, one before
                       {"Answer": ["How many apples"]},
                       {"84.0": ["89 apples", "5", "Peter"]},
                       {"84.0": ["Ruth starts with", "a pear"]},   # the same effect again; "a pear" is absent
                       {"Peter": "She shares"}]}                   # one cause given as a string


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_official_shapes_load_with_cats_join(tmp_path):
    train = read_jsonl(write(tmp_path / "train.jsonl", STG_TRAIN + [STG_H, MAWPS]))
    stg, stg_h, mawps = train[0], train[2], train[3]
    assert full_text(stg) == STG_TRAIN[0]["input"] + "High Risk"  # no extra space: the input ends in "Answer: "
    assert stg.important == {"High Risk": ["Exercise: 2", "Weight: 4", "Smoking: 8"]}
    assert stg_h.target == "32" and full_text(stg_h).endswith("scale? Answer: 32")
    assert full_text(mawps).endswith("end with?Answer: 84.0")
    assert mawps.important["84.0"] == ["89 apples", "5", "Peter", "Ruth starts with", "a pear"]
    assert mawps.important["Peter"] == ["She shares"]
    (test,) = read_jsonl(write(tmp_path / "test.jsonl", STG_TEST))
    assert test.important == {}


def test_pairs_that_cannot_supervise_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    data = read_file(write(tmp_path / "train.jsonl", STG_TRAIN + [STG_H, MAWPS]))
    checked, report = check_annotations(data, tiny_tokenizer)
    assert (report.examples, report.annotated, report.supervised, report.complete) == (4, 4, 4, 3)
    assert (report.pairs, report.kept, report.not_before, report.not_found) == (6 + 3 + 10, 6 + 3 + 7, 2, 1)
    mawps = checked.examples[3]
    assert "89 apples" not in mawps.important  # its only cause ends right before it
    assert mawps.important["How many apples"] == ["She shares"]
    assert mawps.important["84.0"] == ["89 apples", "5", "Peter", "Ruth starts with"]
    assert "2 cause not before effect, 1 text not found" in report.summary()
    # what is left builds a mask; the answer is labelled from the first character after the input
    tiny_tokenizer.padding_side = "right"
    batch = collate(checked.examples, tiny_tokenizer)
    for row, example in enumerate(checked.examples):
        answer = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
        assert tiny_tokenizer.decode(answer).strip() == example.target.strip()
    assert bool(batch.causal_mask.valid_rows().any(-1).all())


def test_strict_keeps_the_errors_with_file_and_line(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "mawps.jsonl", STG_TRAIN + [MAWPS])
    with pytest.raises(ValueError, match=r"mawps\.jsonl:3: annotated text 'a pear' does not occur"):
        read_file(path, strict=True)
    mawps = dict(MAWPS, important=MAWPS["important"][:4])
    data = read_file(write(tmp_path / "mawps.jsonl", STG_TRAIN + [mawps]), strict=True)
    with pytest.raises(ValueError, match=r"mawps\.jsonl:3: cause 'She shares' of effect '89 apples' does not "
                                         "end before it"):
        check_annotations(data, tiny_tokenizer, strict=True)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return tiny.ensure_tiny_base(SMALL, tmp_path_factory.mktemp("cache"), show_progress=False, log=lambda m: None)


def test_train_with_named_eval_files(small_model, tmp_path, capsys):
    train = write(tmp_path / "stg_train.jsonl", (STG_TRAIN * 4) + [MAWPS] * 4)
    iid, ood = write(tmp_path / "iid.jsonl", STG_TEST * 3), write(tmp_path / "ood.jsonl", STG_TEST * 2)
    out = tmp_path / "job"
    options = [option for option in FAST if option not in ("--train-examples", "32", "--eval-examples", "12")]
    code = main(["train", "--model", str(small_model), "--data", str(train), "--eval-data", f"iid={iid}",
                 "--eval-data", f"ood={ood}", "--runs", "ce+cat", "--epochs", "1", *options,
                 "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"annotations: {train}: 12 examples, 12 with CAT supervision" in printed
    assert "iid acc" in printed and "ood acc" in printed and "This is a toy" not in printed
    report = report_of(out)
    assert report["data"]["eval"] == {"iid": 3, "ood": 2}
    assert {row["split"] for row in report["runs"][0]["accuracy"]} == {"iid", "ood"}


@pytest.mark.parametrize("records, extra, message", [
    ([STG_TRAIN[0], {"input": "x"}], [], ":2: missing field(s) ['target']"),
    (STG_TRAIN, ["--eval-data", "a=X", "--eval-data", "a=X"], "--eval-data: the name 'a' is given twice"),
    (STG_TRAIN, ["--train-examples", "5"], "--train-examples: 5 records asked for, but"),
])
def test_data_errors_come_before_any_work(small_model, tmp_path, capsys, records, extra, message):
    train = write(tmp_path / "train.jsonl", records)
    evals = [arg.replace("X", str(train)) for arg in extra]
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), "--data", str(train), *evals, "--quiet",
                 "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # no empty output directory left behind


def test_strict_flag_stops_at_the_first_skipped_pair(small_model, tmp_path, capsys):
    mawps = dict(MAWPS, important=MAWPS["important"][:4])
    train = write(tmp_path / "train.jsonl", STG_TRAIN * 2 + [mawps])
    out = tmp_path / "job"
    assert main(["train", "--model", str(small_model), "--data", str(train), "--strict", "--quiet",
                 "--output-dir", str(out)]) == 2
    assert f"--data: {train}:5: cause 'She shares'" in capsys.readouterr().err
    assert not out.exists()


def test_train_with_bf16_autocast_and_gradient_checkpointing(small_model, tmp_path):
    train = write(tmp_path / "train.jsonl", STG_TRAIN * 4)
    out = tmp_path / "job"
    options = [option for option in FAST if option not in ("--train-examples", "32", "--eval-examples", "12")]
    assert main(["train", "--model", str(small_model), "--data", str(train), "--runs", "ce+cat+xg", *options,
                 "--epochs", "1", "--mixed-precision", "bf16", "--gradient-checkpointing",
                 "--output-dir", str(out)]) == 0
    history = report_of(out)["runs"][0]["history"]
    assert len(history) == 2 and all(row["cat"] != 0 and row["loss"] == row["loss"] for row in history)


def test_open_answers_are_scored_by_generation(small_model, tmp_path, capsys):
    def stg_h(value):  # STG_H's shape with a JSON integer target; 65 distinct targets is an open answer set
        return {**STG_H, "target": value, "important": [{f"Answer: {value}": ["47.9", "28.9"]}]}

    train = write(tmp_path / "train.jsonl", [stg_h(v) for v in range(65)])
    test = write(tmp_path / "iid.jsonl", [stg_h(v) for v in (3, 40, 64)])
    out = tmp_path / "job"
    options = [option for option in FAST if option not in ("--train-examples", "32", "--eval-examples", "12")]
    assert main(["train", "--model", str(small_model), "--data", str(train), "--eval-data", str(test),
                 "--runs", "ce", *options, "--batch-size", "16", "--epochs", "1", "--output-dir", str(out)]) == 0
    assert "exact match of greedily generated answers" in capsys.readouterr().out
    accuracy = report_of(out)["runs"][0]["accuracy"]
    assert [(row["epoch"], row["split"]) for row in accuracy] == [(0, "iid"), (1, "iid")]
    assert all(0 <= row["accuracy"] <= 1 for row in accuracy)


def test_answer_matching_is_word_exact():
    from causalattn.lab.training.evaluate import answer_matches

    assert answer_matches(" 84.0 apples", "84.0") and answer_matches("Answer: 84.0\n", "Answer: 84.0")
    assert not answer_matches("84.05", "84.0") and not answer_matches("", "84.0")


def test_max_steps_ends_the_run_early_and_checkpoints_it(small_model, tmp_path):
    train = write(tmp_path / "train.jsonl", STG_TRAIN * 8)  # 16 examples, 4 steps per epoch at batch 4
    test = write(tmp_path / "iid.jsonl", STG_TEST)
    out = tmp_path / "job"
    options = [option for option in FAST if option not in ("--train-examples", "32", "--eval-examples", "12")]
    args = ["train", "--model", str(small_model), "--data", str(train), "--eval-data", str(test),
            "--runs", "ce+cat", *options, "--output-dir", str(out)]
    assert main(args + ["--max-steps", "6"]) == 0  # 2 epochs would be 8 steps
    run = report_of(out)["runs"][0]
    assert [row["step"] for row in run["history"]] == [1, 2, 3, 4, 5, 6]
    assert [row["epoch"] for row in run["accuracy"]] == [0, 1, 2]
    assert (out / "ce-cat" / "checkpoints" / "epoch-002").is_dir()
    assert main(args + ["--max-steps", "6", "--resume"]) == 0  # nothing left to train
    assert report_of(out)["runs"][0]["history"] == run["history"]
