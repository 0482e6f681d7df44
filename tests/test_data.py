"""The Spurious Token Game generator and the CAT-style JSONL reader."""
import json
import re

import pytest

from causalattn.data import read_jsonl, write_jsonl
from causalattn.lab.tasks import generate, make_splits
from causalattn.data.batches import full_text
from causalattn.lab.tasks.stg import CAUSAL, FEATURES, SPURIOUS, THRESHOLD


def parse_values(text):
    return {name: int(value) for name, value in re.findall(r"([A-Z][a-z]+(?: [a-z]+)?): (\d+)", text)}


def test_labels_follow_the_formula_and_text_matches_values():
    for example in generate(500, seed=3) + generate(500, seed=4, ood=True):
        values = parse_values(example.input)
        assert set(values) == set(FEATURES) and values == example.values
        score = 1.2 * values["Smoking"] + 0.7 * values["Weight"] - values["Exercise"]
        assert example.target == ("High Risk" if score > THRESHOLD else "Low Risk")


def test_spurious_features_follow_causes_in_iid_only():
    iid, ood = generate(400, seed=1), generate(400, seed=1, ood=True)
    for example in iid:
        v = example.values
        assert v["Yellow fingers"] == int(1.5 * v["Smoking"])
        assert v["Clothing size"] == v["Weight"] and v["Hormones"] == v["Exercise"] // 2
    broken = sum(e.values["Clothing size"] != e.values["Weight"] for e in ood)
    assert broken > 300  # independent in OOD: equal only by chance (1 in 10)


def test_annotations_name_the_causes_as_written():
    for example in generate(50, seed=5):
        (effect, causes), = example.important.items()
        assert effect == example.target
        assert [c.split(":")[0] for c in causes] == list(CAUSAL)
        assert all(cause in example.input for cause in causes)


def test_feature_order_is_shuffled_and_generation_is_seeded():
    examples = generate(40, seed=9)
    orders = {tuple(re.findall(r"([A-Z][a-z]+(?: [a-z]+)?):", e.input))[:8] for e in examples}
    assert len(orders) > 20
    assert generate(40, seed=9) == examples and generate(40, seed=10) != examples


def test_splits_have_requested_sizes_and_both_labels():
    splits = make_splits(train=300, iid_test=100, ood_test=100, seed=2)
    assert (len(splits.train), len(splits.iid_test), len(splits.ood_test)) == (300, 100, 100)
    for split in (splits.train, splits.ood_test):
        share = sum(e.target == "High Risk" for e in split) / len(split)
        assert 0.2 < share < 0.8
    assert not any(e.values["Clothing size"] != e.values["Weight"] for e in splits.iid_test)
    assert all(name in splits.ood_test[0].values for name in SPURIOUS)


def test_jsonl_round_trip(tmp_path):
    examples = generate(10, seed=0)
    path = tmp_path / "stg.jsonl"
    write_jsonl(path, examples)
    back = read_jsonl(path)
    assert [(full_text(e), e.target, e.important) for e in back] == [(full_text(e), e.target, e.important)
                                                                     for e in examples]


def test_jsonl_accepts_a_list_of_causes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"input": "Rain: yes. Wet?", "target": "Yes", "important": ["Rain: yes"]}) + "\n\n")
    (example,) = read_jsonl(path)
    assert example.important == {"Yes": ["Rain: yes"]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"input": "a"}', "missing field"),
    ('{"input": "a", "target": ""}', "must not be empty"),
    ('{"input": 3, "target": "b"}', "'input' must be a string"),
    ('{"input": "a b", "target": "c", "important": {"c": [3]}}', "must be a list"),
    ('{"input": "a b", "target": "c", "important": {"c": ["zzz"]}}', "does not occur"),
    ('{"input": "a b", "target": "c", "important": 3}', "'important' must be a list"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"input": "x y", "target": "z"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        read_jsonl(path, strict=True)


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(path)


def test_collate_labels_only_the_answer_and_masks_the_causes(tiny_tokenizer):
    from causalattn.data.batches import IGNORE_INDEX, collate

    examples = generate(4, seed=0)
    for side in ("right", "left"):
        tiny_tokenizer.padding_side = side
        batch = collate(examples, tiny_tokenizer)
        for row, example in enumerate(examples):
            answer_ids = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
            assert tiny_tokenizer.decode(answer_ids).strip() == example.target
            positions = (batch.labels[row] != IGNORE_INDEX).nonzero().flatten()
            dense = batch.causal_mask.to_dense()[row]
            # the rows predicting the answer tokens (one before each) attend to the causes
            supervised = dense.any(-1).nonzero().flatten()
            assert supervised.tolist() == (positions - 1).tolist()
            cause_text = tiny_tokenizer.decode(batch.input_ids[row][dense[positions[0] - 1]])
            for cause in example.important[example.target]:
                assert cause.replace(" ", "") in cause_text.replace(" ", "")


def test_collate_carries_domains_label_rows_and_prompt_tokens(tiny_tokenizer):
    import dataclasses

    from causalattn.data.batches import IGNORE_INDEX, collate

    examples = [dataclasses.replace(e, domain=i % 2) for i, e in enumerate(generate(3, seed=0))]
    batch = collate(examples, tiny_tokenizer)
    assert batch.domains.tolist() == [0, 1, 0]
    assert collate(generate(2, seed=0), tiny_tokenizer).domains is None  # no ids: None, not a guess
    for row in range(3):
        first_answer = int((batch.labels[row] != IGNORE_INDEX).nonzero()[0])
        assert int(batch.label_rows()[row]) == first_answer - 1  # the row that predicts the answer
        prompt = batch.prompt_tokens()[row]
        assert prompt[:first_answer].all() and not prompt[first_answer:].any()


def test_collate_rejects_a_cut_answer(tiny_tokenizer):
    from causalattn.data.batches import collate

    with pytest.raises(ValueError, match="do not fit in max_length=12"):
        collate(generate(2, seed=0), tiny_tokenizer, max_length=12)
