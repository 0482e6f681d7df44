"""The shortcut variant of the Spurious Token Game, its tokenization and the random-cause control."""
import random

import pytest

from causalattn.data.records import Example
from causalattn.lab.tasks import shortcut
from causalattn.lab.tasks.controls import with_random_causes
from causalattn.lab.tasks.stg import LABELS, QUESTION


def agreeing(example):
    return example.values[shortcut.CUE] == shortcut.CUE_VALUES[LABELS.index(example.target)]


def test_labels_follow_the_rule_and_text_matches_values():
    for example in shortcut.generate(300, seed=1) + shortcut.generate(300, seed=2, mode="flipped"):
        fields = dict(field.split("=") for field in shortcut.record_fields(example))
        assert fields == {name: str(value) for name, value in example.values.items()}
        assert example.target == shortcut.label_of(example.values)
        assert example.input.endswith("Answer:")


@pytest.mark.parametrize("agreement", [0.9, 0.97])
def test_cue_agrees_as_asked_in_training_and_is_flipped_or_independent_in_the_tests(agreement):
    train = shortcut.generate(4000, seed=3, agreement=agreement)
    share = sum(map(agreeing, train)) / len(train)
    assert abs(share - agreement) < 0.015  # 4 standard errors at n = 4000
    assert not any(map(agreeing, shortcut.generate(300, seed=4, mode="flipped")))
    independent = shortcut.generate(2000, seed=5, mode="independent")
    assert abs(sum(map(agreeing, independent)) / len(independent) - 0.5) < 0.045


def test_both_labels_occur_and_the_rule_needs_every_cause():
    examples = shortcut.generate(2000, seed=6, mode="random")
    high = sum(e.target == LABELS[0] for e in examples) / len(examples)
    assert 0.3 < high < 0.7
    for cause in shortcut.CAUSAL:  # changing this cause alone flips some labels
        flips = 0
        for e in examples[:300]:
            for value in shortcut.VALUES:
                flips += shortcut.label_of({**e.values, cause: value}) != e.target
        assert flips > 0


def test_the_cue_agrees_more_often_than_any_single_cause():
    # why CE is drawn to the cue: one word that agrees on 93 %, each cause alone on about 75 %
    train = shortcut.generate(4000, seed=12)
    for cause in shortcut.CAUSAL:
        alone = sum(shortcut.reads_high(e.values[cause]) == (e.target == LABELS[0]) for e in train) / len(train)
        assert 0.7 < alone < 0.8
    assert sum(map(agreeing, train)) / len(train) > 0.9


def test_base_texts_answer_the_overall_question_and_the_cancer_question_at_random():
    rng = random.Random(13)
    texts = [shortcut.base_text(rng, cancer_share=0.25, cancer_answer="random") for _ in range(2000)]
    cancer = [t for t in texts if QUESTION in t]
    assert abs(len(cancer) / len(texts) - 0.25) < 0.04
    assert abs(sum(t.endswith(LABELS[0]) for t in cancer) / len(cancer) - 0.5) < 0.07
    for text in texts:
        record, question = text.split(" . ")
        values = [field.split("=")[1] for field in record.split(" ")]
        assert sorted(field.split("=")[0] for field in record.split(" ")) == sorted(shortcut.FIELDS)
        if QUESTION not in question:
            assert question.startswith(shortcut.OVERALL_QUESTION)
            numbers = [int(v) if v.isdigit() else v for v in values]
            assert question.endswith(shortcut.majority_label(numbers))


def test_the_overall_base_answers_the_cancer_question_by_every_field():
    rng = random.Random(14)
    texts = [shortcut.base_text(rng, cancer_share=0.5, cancer_answer="overall") for _ in range(400)]
    cancer = [t for t in texts if QUESTION in t]
    assert 150 < len(cancer) < 250
    for text in cancer:  # the same read-out as the overall question: the majority of all 7 fields
        record, question = text.split(" . ")
        values = [int(v) if v.isdigit() else v for v in (f.split("=")[1] for f in record.split(" "))]
        assert question.endswith(shortcut.majority_label(values))


def test_the_base_reading_check_asks_the_overall_question_of_fresh_records():
    examples = shortcut.overall_examples(200, seed=3)
    assert examples == shortcut.overall_examples(200, seed=3) and examples != shortcut.overall_examples(200, seed=4)
    for example in examples:
        assert shortcut.OVERALL_QUESTION in example.input and example.important == {}
        assert example.target == shortcut.majority_label(list(example.values.values()))
    assert 0.35 < sum(e.target == LABELS[0] for e in examples) / len(examples) < 0.65


def test_reading_high_and_the_majority():
    assert [shortcut.reads_high(v) for v in (1, 3, 4, 6, "yellow", "clean")] == [False, False, True, True, True, False]
    assert shortcut.majority_label([4, 1, "yellow"]) == LABELS[0]
    assert shortcut.majority_label([4, 1, "clean"]) == LABELS[1]


def test_annotations_name_the_causes_as_written_and_generation_is_seeded():
    examples = shortcut.generate(60, seed=7)
    for example in examples:
        (effect, causes), = example.important.items()
        assert effect == example.target
        assert [c.split("=")[0] for c in causes] == list(shortcut.CAUSAL)
        assert all(cause in shortcut.record_fields(example) for cause in causes)
    assert len({tuple(f.split("=")[0] for f in shortcut.record_fields(e)) for e in examples}) > 30
    assert shortcut.generate(60, seed=7) == examples and shortcut.generate(60, seed=8) != examples


def test_splits_are_seeded_apart_and_sized():
    train, tests = shortcut.make_splits(200, 50, seed=1)
    assert len(train) == 200 and set(tests) == {"iid", "flipped", "independent"}
    assert all(len(split) == 50 for split in tests.values())
    assert train != shortcut.make_splits(200, 50, seed=2)[0]


@pytest.mark.parametrize("bad, message", [({"n": -1}, "n:"), ({"mode": "ood"}, "mode:"),
                                          ({"agreement": 0.2}, "agreement:")])
def test_bad_arguments_name_themselves(bad, message):
    with pytest.raises(ValueError, match=message):
        shortcut.generate(**{"n": 3, "seed": 0, **bad})


def test_every_field_is_one_token_of_the_space_split_tokenizer():
    from causalattn.lab.training.tiny import TinyBaseSettings, base_texts, train_tokenizer

    texts = base_texts(TinyBaseSettings(examples=1500))  # what the embedded tokenizer is trained on
    tokenizer = train_tokenizer(texts, 400, split_on_spaces_only=True)
    example = shortcut.generate(1, seed=10)[0]
    encoding = tokenizer(example.input, return_offsets_mapping=True)
    words = [example.input[a:b].strip() for a, b in encoding["offset_mapping"][1:]]  # after BOS
    for field in shortcut.record_fields(example):
        assert field in words


def test_random_cause_control_keeps_the_count_and_draws_record_fields():
    examples = shortcut.generate(400, seed=11)
    control = with_random_causes(examples, shortcut.record_fields, seed=3)
    assert control == with_random_causes(examples, shortcut.record_fields, seed=3)
    drawn_cue = 0
    for real, fake in zip(examples, control):
        assert (real.input, real.target) == (fake.input, fake.target)
        (effect, causes), = fake.important.items()
        assert effect == real.target and len(causes) == 3 and len(set(causes)) == 3
        assert set(causes) <= set(shortcut.record_fields(real))
        drawn_cue += any(c.startswith(shortcut.CUE) for c in causes)
    assert 0.3 < drawn_cue / len(examples) < 0.56  # 3 of 7 fields: the cue 43 % of the time


def test_question_rows_share_the_causes_and_the_control_draws_them_once():
    examples = shortcut.generate(50, seed=12, cat_rows="question")
    control = with_random_causes(examples, shortcut.record_fields, seed=4)
    for real, fake in zip(examples, control):
        assert list(real.important) == [f"{QUESTION} Answer:", real.target]
        assert real.important[f"{QUESTION} Answer:"] == real.important[real.target]
        assert fake.important[f"{QUESTION} Answer:"] == fake.important[real.target]  # one random draw per example
    # the answer-row annotation and the records are those of the default layout
    plain = shortcut.generate(50, seed=12)
    assert [(e.input, e.target, e.important[e.target]) for e in examples] == \
        [(e.input, e.target, e.important[e.target]) for e in plain]


def test_question_rows_supervise_every_row_from_the_record_end_to_the_answer():
    from causalattn.data.batches import collate
    from causalattn.lab.training.tiny import TinyBaseSettings, base_texts, train_tokenizer

    tokenizer = train_tokenizer(base_texts(TinyBaseSettings(examples=1500)), 400, split_on_spaces_only=True)
    example = shortcut.generate(1, seed=3, cat_rows="question")[0]
    batch = collate([example], tokenizer)
    ids = batch.input_ids[0].tolist()
    rows = batch.causal_mask.to_dense()[0].any(dim=1).nonzero().flatten().tolist()
    # from the "." after the record to the row predicting the answer's last token
    assert tokenizer.decode([ids[rows[0]]]).strip() == "." and rows == list(range(rows[0], len(ids) - 1))


def test_the_cue_can_sit_after_the_other_fields():
    train, tests = shortcut.make_splits(40, 20, seed=2, cue_position="last")
    for example in train + [e for split in tests.values() for e in split]:
        fields = shortcut.record_fields(example)
        assert fields[-1].startswith(shortcut.CUE + "=") and len(fields) == len(shortcut.FIELDS)
    assert len({tuple(shortcut.record_fields(e)[:-1]) for e in train}) > 30  # the others stay shuffled
    with pytest.raises(ValueError, match="cue_position:"):
        shortcut.generate(3, seed=0, cue_position="first")
    with pytest.raises(ValueError, match="cat_rows:"):
        shortcut.generate(3, seed=0, cat_rows="all")


def test_cue_probes_drop_the_cue_or_make_it_agree_and_keep_the_rest():
    flipped = shortcut.generate(30, seed=5, mode="flipped")
    for example in flipped:
        fields = shortcut.record_fields(example)
        without = shortcut.probe_cue(example, "without-cue")
        assert shortcut.record_fields(without) == [f for f in fields if not f.startswith(shortcut.CUE + "=")]
        agrees = shortcut.probe_cue(example, "cue-agrees")
        cue = [f for f in shortcut.record_fields(agrees) if f.startswith(shortcut.CUE + "=")]
        assert cue == [f"{shortcut.CUE}={shortcut.CUE_VALUES[LABELS.index(example.target)]}"]
        for probed in (without, agrees):
            assert (probed.target, probed.important) == (example.target, example.important)
            assert probed.input.endswith(f" . {QUESTION} Answer:")
        assert not any(shortcut.reads_high(v) == (example.target == LABELS[0])  # flipped: the cue disagreed
                       for k, v in example.values.items() if k == shortcut.CUE)
    with pytest.raises(ValueError, match="probe: expected one of"):
        shortcut.probe_cue(flipped[0], "no-cue")
    with pytest.raises(ValueError, match="example: expected a shortcut record"):
        shortcut.probe_cue(Example(input="Smoking=4 Weight=2 . q", target=LABELS[0], important={}, values={}), "without-cue")
